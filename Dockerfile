# One image for the aggregation server and the device clients (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# torch first, from the CPU-only index: the default index pulls gigabytes of CUDA packages.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY proto ./proto
COPY common ./common
COPY server ./server
COPY client ./client
COPY xeno ./xeno
RUN pip install .

RUN useradd --create-home --uid 10001 xeno && mkdir -p /data && chown xeno /data
USER xeno
VOLUME ["/data"]
EXPOSE 50051
ENTRYPOINT ["xeno-fl"]
CMD ["--help"]
