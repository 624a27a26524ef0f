#!/bin/sh
# Refuse to start with a secret still at its docker/.env.example placeholder, then run the
# command (tini is PID 1 and forwards signals to it).
set -eu
for var in POSTGRES_PASSWORD RAY_AUTH_TOKEN; do
  eval "value=\${$var:-}"
  case "$value" in
    change-me*)
      echo "ablate: $var is still the placeholder from docker/.env.example; set a real secret in docker/.env" >&2
      exit 2 ;;
  esac
done
exec "$@"
