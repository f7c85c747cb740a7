# syntax=docker/dockerfile:1
# portcullis container image: a release build, then a minimal runtime.
#
#   docker build -t portcullis:dev .
#   docker run --read-only -p 8443:8443 -v "$PWD/my-config:/etc/portcullis/config:ro" portcullis:dev
#
# The runtime stage is distroless (glibc, CA roots, no shell, no package
# manager), runs as the non-root uid 65532 and writes nothing outside the
# volumes it is given (/var/lib/portcullis for the store, /tmp as tmpfs), so
# it works with a read-only root filesystem.

# The toolchain the project is built and tested with (Cargo.toml rust-version is the floor).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# aws-lc-sys builds AWS-LC from C sources: cmake and a C compiler (gcc comes with the image).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so a source-only change reuses the cached layer.
# scripts/release-build.sh is the release build: cargo with the optimisation
# profile in build/pgo (profile-guided; both layers use the same flags, so the
# dependencies' layer is reused).
COPY Cargo.toml Cargo.lock build.rs ./
COPY build ./build
COPY benches ./benches
COPY scripts/release-build.sh ./scripts/
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && scripts/release-build.sh \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && scripts/release-build.sh \
 && install -D -m 0755 target/release/portcullis /out/portcullis \
 && install -d -m 0755 /out/state

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="Identity-aware reverse proxy: device posture and identity lifecycle, enforced at request time" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/portcullis /usr/local/bin/portcullis
COPY --from=build --chown=65532:65532 /out/state /var/lib/portcullis
COPY config/policies /etc/portcullis/policies
USER 65532:65532
WORKDIR /var/lib/portcullis
VOLUME ["/var/lib/portcullis"]
# 8443: the TLS proxy listener; 9090: admin (/metrics, /healthz, /readyz, feeds).
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["serve", "--config", "/etc/portcullis/config/portcullis.toml"]
