# launchgate: a slim, non-root image that runs `launchgate serve`.
#   docker build -t launchgate .
#   docker run -p 8080:8080 -p 9901:9901 -v $PWD/my-config:/etc/launchgate launchgate
# The shipped config/ listens on 127.0.0.1 and trusts no key; mount a configuration whose
# [server] listen and admin_listen use 0.0.0.0 and whose keys/jwks.json holds your public
# keys. The ledger and the decision log go to its data/ folder (relative paths): keep it on
# the mount, made beforehand and writable by uid 10001 (`launchgate check` says so when it is
# not), or licence use and the audit chain start afresh with every new container.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin launchgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels launchgate \
 && rm -rf /wheels
COPY config/ /etc/launchgate/
# Trust no key baked in: `python3 dev.py demo` adds its own to config/keys/jwks.json, and its
# private half stays in the checkout (found by QA).
RUN printf '{"keys": []}\n' > /etc/launchgate/keys/jwks.json
# The ledger and decision log live under the config folder's data/ (relative paths).
RUN mkdir -p /etc/launchgate/data && chown launchgate /etc/launchgate/data
USER launchgate
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# Alive: the admin listener's /healthz on its default port (the image has no curl).
HEALTHCHECK --interval=30s --timeout=3s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["launchgate"]
CMD ["serve", "--config", "/etc/launchgate/launchgate.toml"]
