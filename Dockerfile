FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd -m atscale
USER atscale
ENV ATSCALE_CACHE_DIR=/home/atscale/.cache/atscale
CMD ["celery", "-A", "tasks", "worker", "-Q", "search,download", "-E", "--loglevel", "INFO"]
