# wsgate in a minimal image, for users who build their own (CI does not build it: these
# machines cannot run containers). Multi-stage: built with the Rust toolchain, run on a slim
# Debian with nothing but the binary, as a non-root user.
#
#   docker build -t wsgate .
#   docker run -p 8080:8080 -v $PWD/config:/etc/wsgate:ro wsgate --config /etc/wsgate/gateway.toml
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin wsgate

FROM debian:bookworm-slim
COPY --from=build /src/target/release/wsgate /usr/local/bin/wsgate
# No shell or package use at run time; any UID works (the Kubernetes base runs 65532).
USER 65532:65532
EXPOSE 8080 8443 9090
ENTRYPOINT ["/usr/local/bin/wsgate"]
CMD ["--config", "/etc/wsgate/gateway.toml"]
