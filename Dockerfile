# The orchestrator image: what a Prefect Docker worker runs guided-ab's flows in
# (prefect.docker.yaml builds and pushes it with prefect-docker's build_docker_image /
# push_docker_image steps). It holds the flows and their Python dependencies, and no vLLM:
# in a container, arms are Modal apps or external endpoints (a local arm's vLLM server would
# share the container's cores, and die with it). Runs are kept in an object store
# (`store: s3://bucket/prefix`) or a volume mounted at $GUIDED_AB_DATA: the container is
# deleted after each flow run.
#
#   docker build -t guided-ab:dev .          # by hand; `prefect deploy --prefect-file prefect.docker.yaml` does it too
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # a relative `store:` resolves here (flows/_common.py); mount a volume or use s3:// for runs that outlive the container
    GUIDED_AB_DATA=/data

WORKDIR /opt/guided-ab

# the dependencies first, in their own layer: a code change does not reinstall them
COPY requirements.txt ./
RUN pip install -r requirements.txt

# the code; the deployments' entrypoints (flows/...) are relative to this directory, where the
# pull step (set_working_directory) starts every flow run
COPY guided_ab ./guided_ab
COPY flows ./flows
COPY tasks ./tasks
COPY modal_apps ./modal_apps
COPY configs ./configs
# importable from anywhere (the flows, and the Modal app that ships guided_ab into its image)
ENV PYTHONPATH=/opt/guided-ab
RUN useradd --create-home --uid 10001 guided-ab && mkdir -p /data && chown guided-ab /data

# not root: a flow run only needs its working directory, /data and the network
USER guided-ab
