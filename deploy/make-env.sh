#!/bin/sh
# Writes deploy/.env (mode 0600, not committed) with fresh random credentials for
# compose.yaml: the S3 secret key (MinIO's root password) and one NATS password per user.
# Refuses to overwrite an existing one (its passwords are in NATS's and MinIO's volumes).
set -eu
env=$(dirname "$0")/.env
[ -e "$env" ] && { echo "$env exists; delete it (and the compose volumes) to start afresh" >&2; exit 1; }
umask 077
python3 - > "$env" <<'PY'
import secrets
for key in ("ALMAPIPE_S3_SECRET_KEY", "NATS_PASSWORD_ADMIN", "NATS_PASSWORD_GATEWAY", "NATS_PASSWORD_IMPORTER",
            "NATS_PASSWORD_CALIBRATOR", "NATS_PASSWORD_IMAGER", "NATS_PASSWORD_WEBLOG"):
    print(f"{key}={secrets.token_hex(24)}")
PY
echo "wrote $env"
