# syntax=docker/dockerfile:1
# Postern: a release build in a full Rust image, run from a small Debian image as a non-root user.

FROM rust:1-bookworm AS build
# pingora's zlib-ng is built from source with cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo validates every target the manifest declares, so the test and example sources come along.
COPY tests ./tests
COPY examples ./examples
# The workspace's other member (the benchmark harness) must be present for the manifest to load.
COPY bench ./bench
RUN cargo build --release --locked --bin postern

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin postern
COPY --from=build /src/target/release/postern /usr/local/bin/postern
COPY config/postern.toml /etc/postern/postern.toml
USER 10001
# inbound proxy, management API (loopback by default), admin probes and metrics
EXPOSE 8081 9090 9091
ENTRYPOINT ["postern"]
CMD ["run", "--config", "/etc/postern/postern.toml"]
