"""pulse-batch: batch transcription jobs for the Pulse streaming speech-to-text service."""

__version__ = "0.1.0"
