# The taskyard image: the package, its CLI and the example service (examples.bdc).
# docker-compose.yml runs every service (workers, beat, Flower, the stats API) from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p src/taskyard examples \
    && touch src/taskyard/__init__.py examples/__init__.py \
    && pip install . \
    && pip uninstall -y taskyard

COPY src ./src
COPY examples ./examples
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 taskyard

# Celery refuses to be comfortable as root; the services need no privileges.
USER taskyard
WORKDIR /home/taskyard

EXPOSE 5555 8000
CMD ["taskyard", "--help"]
