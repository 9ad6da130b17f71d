# kiln's container image: a static-ish binary built with the `dist` profile (fat LTO), on a
# small Debian runtime with git and CA certificates, run as an unprivileged user.
#
#   docker build -t registry.example.com/kiln:latest --build-arg KILN_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker push registry.example.com/kiln:latest     # the image manifests/kubernetes/kiln.yaml runs
#
# Hooks run inside this container: extend it with the CLIs your hooks call (packer, terraform,
# aws, aliyun), e.g. `FROM registry.example.com/kiln:latest` + `USER root` + apt-get + `USER kiln`.

FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# `kiln --version` names the commit; the build context has no .git (see .dockerignore).
ARG KILN_COMMIT=unknown
ENV KILN_COMMIT=${KILN_COMMIT}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile dist \
    && install -m 0755 target/dist/kiln /usr/local/bin/kiln

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git openssh-client libssl3 \
    && rm -rf /var/lib/apt/lists/*
# UID/GID 10001 match the Kubernetes manifest's securityContext.
RUN groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --home-dir /home/kiln --create-home \
       --shell /usr/sbin/nologin kiln \
    && install -d -o kiln -g kiln -m 0750 /var/lib/kiln
COPY --from=build /usr/local/bin/kiln /usr/local/bin/kiln
# HOME: git and ssh (known_hosts) and hooks write there; on a read-only root filesystem mount a
# volume at /home/kiln (manifests/kubernetes/kiln.yaml does).
ENV HOME=/home/kiln \
    KILN_DATA_DIR=/var/lib/kiln \
    KILN_LOG=info
USER kiln:kiln
WORKDIR /var/lib/kiln
VOLUME ["/var/lib/kiln"]
EXPOSE 7878
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["--help"]
