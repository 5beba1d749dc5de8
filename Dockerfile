# The production worker image: the core package only (no embedded servers, no fake payment provider,
# no platform stand-in: those are embedded/, for laptops and CI). Two stages: wheels are built in the
# first, the second installs them and keeps no compiler, cache or source.
# The same image runs every entrypoint: `remediate worker` (default), `remediate codec-server`,
# `remediate approvals serve`, `remediate alerts serve`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY activities/ activities/
COPY alert_intake/ alert_intake/
COPY approval_page/ approval_page/
COPY config/ config/
COPY contracts/ contracts/
COPY database/ database/
COPY migrations/ migrations/
COPY remediation_client/ remediation_client/
COPY starters/ starters/
COPY worker/ worker/
COPY workflows/ workflows/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin remediation
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels billing-remediation \
    && rm -rf /wheels
USER 10001
WORKDIR /home/remediation
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
CMD ["remediate", "worker"]
