# One image for every service (compose and Kubernetes pick the module to run), plus the local
# stand-ins that run from it (the mail sink, the Stripe stand-in) and the migration job.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# The fonts invoice PDFs embed, the same Debian packages `make install` puts on a developer's
# machine (services/invoice/pdf/system.py FONT_PACKAGES): Noto Sans with its Arabic and Hebrew
# faces, the Droid fallback for CJK (reportlab embeds TrueType, not Noto CJK's collections) and
# DejaVu for symbols; without them such names render as empty boxes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-noto-core fonts-droid-fallback fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY kit ./kit
COPY contracts ./contracts
COPY services ./services
COPY deploy ./deploy
# [local]: aiosmtpd for the compose mail sink (python -m deploy.mailsink) runs from this image too.
RUN pip install --no-cache-dir '.[local]'
# Owned by nobody, so the named volumes compose mounts there start writable for it.
RUN mkdir -p /mail /state && chown nobody:nogroup /mail /state
USER nobody
EXPOSE 8000
CMD ["python", "-m", "services.gateway"]
