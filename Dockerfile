# One image for the five services: `python -m nudge_<service> run|migrate`.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/nudge PATH=/opt/nudge/bin:$PATH
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
COPY pyproject.toml uv.lock ./
COPY libs ./libs
COPY services ./services
RUN uv sync --frozen --no-dev --python python3.11
ENV NUDGE_HTTP_HOST=0.0.0.0 NUDGE_ENVIRONMENT=production
USER nobody
