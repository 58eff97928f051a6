# The Graysteer sidecar (also the sample backends of docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
# setup.py generates the admin API's code from protos/ at build time (grpcio-tools).
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY sidecar ./sidecar
RUN pip install --no-cache-dir . && useradd --system --uid 10001 graysteer
USER graysteer
EXPOSE 50051
ENTRYPOINT ["graysteer"]
CMD ["serve", "--config", "/etc/graysteer/rules.yaml", "--listen", "127.0.0.1:50051"]
