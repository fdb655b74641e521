# rabo_flwr: one image for every role. Build once:  docker build -t rabo-flwr .
#   simulation (default):  docker run --rm -v /path/to/data:/data rabo-flwr
#   SuperLink:             docker run --rm -p 8000:8000 -v /path/to/data:/data -v $PWD/results:/results rabo-flwr superlink
#   SuperNode:             docker run --rm -v /path/to/data:/data -e SUPERLINK=host:8000 \
#                              -e PARTITION_ID=0 -e CAPACITY=0.5 rabo-flwr supernode
FROM python:3.11-slim

# offline.env (sourced by the entrypoint) turns off Flower's runtime installs, telemetry and update check
ENV PYTHONUNBUFFERED=1 \
    RABO_OFFLINE=1 \
    RABO_DATA_DIR=/data \
    RABO_CACHE_DIR=/cache \
    RABO_RESULTS_ROOT=/results

WORKDIR /app
COPY pyproject.toml README.md offline.env ./
COPY rabo_flwr ./rabo_flwr
COPY strategies ./strategies
COPY clients ./clients
COPY scenarios ./scenarios
COPY docker/entrypoint.sh /usr/local/bin/rabo-entrypoint
RUN pip install --no-cache-dir . && chmod +x /usr/local/bin/rabo-entrypoint

VOLUME ["/data", "/cache", "/results"]
ENTRYPOINT ["rabo-entrypoint"]
CMD ["simulation"]
