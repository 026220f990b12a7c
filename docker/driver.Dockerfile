# The harness driver: `harness alloc --runner docker` inside a container, driving the host engine
# through the mounted /var/run/docker.sock (compose.yaml). Built by `harness images`.
ARG PROBE_IMAGE=harness-probe:common
FROM ${PROBE_IMAGE} AS build
COPY wheels/ /tmp/wheels/
RUN /opt/venv/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels --target /opt/driver-site \
      -r /tmp/wheels/requirements.txt

FROM ${PROBE_IMAGE}
COPY --from=build /opt/driver-site /opt/driver-site
COPY harness/ /opt/harness/harness/
COPY docker/ /opt/harness/docker/
ENV PYTHONPATH=/opt/harness:/opt/driver-site MPLBACKEND=Agg
WORKDIR /opt/harness
ENTRYPOINT ["python", "-m", "harness.cli"]
