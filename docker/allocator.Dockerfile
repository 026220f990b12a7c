# An allocator image: the common probe image plus one allocator layer, nothing else.
#   plain   : glibc malloc (nothing preloaded)
#   packaged: + the allocator's Debian/Ubuntu package
#   preload : + LD_PRELOAD set to the absolute path of the real, versioned library file
#             (harness.images resolves it in the `packaged` stage and passes it as ALLOCATOR_LIB)
ARG PROBE_IMAGE=harness-probe:common
FROM ${PROBE_IMAGE} AS plain
ARG ALLOCATOR=glibc
ENV HARNESS_ALLOCATOR=${ALLOCATOR}
LABEL org.harness.allocator=${ALLOCATOR}

FROM plain AS packaged
ARG ALLOCATOR_PACKAGE
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${ALLOCATOR_PACKAGE} \
 && rm -rf /var/lib/apt/lists/*

FROM packaged AS preload
ARG ALLOCATOR_LIB
RUN test -f "${ALLOCATOR_LIB}" && test ! -L "${ALLOCATOR_LIB}" \
 || { echo "ALLOCATOR_LIB=${ALLOCATOR_LIB} is not a real library file" >&2; exit 1; }
ENV LD_PRELOAD=${ALLOCATOR_LIB}
LABEL org.harness.allocator.library=${ALLOCATOR_LIB}
