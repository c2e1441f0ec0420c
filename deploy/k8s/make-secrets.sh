#!/bin/sh
# Creates the Secrets deploy/k8s/ needs, with fresh random passwords; run once per cluster,
# before `kubectl apply -k deploy/k8s`. Nothing secret is kept in the repository.
#
#   ALMAPIPE_TOKENS_FILE=gateway-tokens.json almapipe token add alice --role operator
#   deploy/k8s/make-secrets.sh gateway-tokens.json
#
# almapipe-s3:             ALMAPIPE_S3_ACCESS_KEY / ALMAPIPE_S3_SECRET_KEY (the pipeline's keys
#                          and MinIO's root user)
# almapipe-nats:           one password per NATS user (admin, gateway, importer, calibrator,
#                          imager, weblog) and the cluster routes' password (route)
# almapipe-gateway-tokens: gateway-tokens.json, the gateway's token table (sha256 only)
# Rotate a password: recreate the Secret, then restart NATS and the services.
set -eu
tokens=${1:?usage: make-secrets.sh GATEWAY_TOKENS_JSON}
ns=almapipe
here=$(dirname "$0")
rand() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }   # URL-safe: routes carry it

kubectl apply -f "$here/namespace.yaml"
kubectl -n "$ns" create secret generic almapipe-s3 \
  --from-literal=ALMAPIPE_S3_ACCESS_KEY=almapipe --from-literal=ALMAPIPE_S3_SECRET_KEY="$(rand)"
kubectl -n "$ns" create secret generic almapipe-nats \
  --from-literal=route="$(rand)" --from-literal=admin="$(rand)" --from-literal=gateway="$(rand)" \
  --from-literal=importer="$(rand)" --from-literal=calibrator="$(rand)" \
  --from-literal=imager="$(rand)" --from-literal=weblog="$(rand)"
kubectl -n "$ns" create secret generic almapipe-gateway-tokens --from-file=gateway-tokens.json="$tokens"
