# syntax=docker/dockerfile:1
# The servicedb image: `servicedb operator` (the controllers) and `servicedb relay` (outbox relays).
#   docker build -t ghcr.io/servicedb/servicedb-operator:0.1.0 .

FROM rust:1.95-bookworm AS build
# cmake builds librdkafka (rdkafka's cmake-build feature); libcurl4-openssl-dev matches the build
# prerequisites of hack/install-deps.sh (librdkafka's CMake looks for curl).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin servicedb \
 && cp target/release/servicedb /servicedb

# glibc, libgcc, libssl, zlib (the binary links libz.so.1) and CA certificates; no shell, no
# package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /servicedb /servicedb
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/servicedb"]
CMD ["operator"]
