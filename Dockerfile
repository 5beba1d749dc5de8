FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . && useradd -m remediation
USER remediation
CMD ["remediate", "worker"]
