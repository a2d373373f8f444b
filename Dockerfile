# One image for every service; the compose file picks the module to run.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends fonts-dejavu-core poppler-utils \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY kit ./kit
COPY contracts ./contracts
COPY services ./services
COPY deploy ./deploy
# [local]: aiosmtpd for the compose mail sink (python -m deploy.mailsink) runs from this image too.
RUN pip install --no-cache-dir '.[local]'
USER nobody
EXPOSE 8000
CMD ["python", "-m", "services.gateway"]
