# The image of the example topology in docker-compose.yml: this repository installed with the
# Prometheus extra and Flower, and the example apps in /app/examples (the working directory,
# so `celery -A cluster ...` and `--conf=flowerconfig.py` find them).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md CHANGELOG.md ./
COPY celery_singleton_lock ./celery_singleton_lock
RUN pip install ".[prometheus]" "flower>=2.0"
COPY examples ./examples

RUN useradd --create-home --uid 10001 app
USER app
WORKDIR /app/examples
CMD ["celery", "-A", "cluster", "worker", "--loglevel", "INFO"]
