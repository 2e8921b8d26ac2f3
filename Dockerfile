# The pulse-batch runner: the CLI with its object-storage extras, no local recognizer
# (use `endpoint:` the service; `endpoint: local` needs the recognizer extra).
#
#   docker build -t pulse-batch .
#   docker run --rm -e SMALLEST_API_KEY -v "$PWD/jobs:/jobs" pulse-batch run /jobs/calls.yaml
#
# BASE may name any image with Python 3.11+ and pip (the default is Docker Hub's slim one).
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
ARG EXTRAS=s3,gcs,azure,http,delta
WORKDIR /src
COPY pyproject.toml README.md ./
COPY batch ./batch
# PyAV and pyarrow ship FFmpeg and Arrow inside their wheels: no compiler, no apt-get.
RUN python3 -m venv /opt/pulse-batch \
    && /opt/pulse-batch/bin/pip install --no-cache-dir ".[${EXTRAS}]"

FROM ${BASE}
COPY --from=build /opt/pulse-batch /opt/pulse-batch
# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it without /etc/passwd.
RUN useradd --system --uid 10001 --home-dir /work --create-home pulse
USER 10001:10001
WORKDIR /work
ENV PATH=/opt/pulse-batch/bin:$PATH \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["pulse-batch"]
CMD ["--help"]
