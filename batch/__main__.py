import sys

try:
    from batch.cli import main
except KeyboardInterrupt:  # Ctrl-C while the (large) imports load: nothing was started
    sys.exit(130)

main()
