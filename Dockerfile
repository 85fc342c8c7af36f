# launchgate: a slim, non-root image that runs `launchgate serve`.
#   docker build -t launchgate .
#   docker run -p 8080:8080 -p 9901:9901 -v $PWD/my-config:/etc/launchgate launchgate
# The shipped config/ listens on 127.0.0.1; mount a configuration whose [server] listen
# and admin_listen use 0.0.0.0 (and whose keys/jwks.json holds your public keys).

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
# The ledger and decision log live under the config folder's data/ (relative paths).
RUN mkdir -p /etc/launchgate/data && chown launchgate /etc/launchgate/data
USER launchgate
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["launchgate"]
CMD ["serve", "--config", "/etc/launchgate/launchgate.toml"]
