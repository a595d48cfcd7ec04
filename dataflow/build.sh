#!/usr/bin/env bash
# Build the image (Flex Template launcher + Dataflow worker) and the Flex Template spec.
#
#   PROJECT=my-project REGION=europe-west1 REPOSITORY=dataflow BUCKET=my-bucket dataflow/build.sh
#
# Optional: TAG (default: the git commit, with "-dirty" when the working tree has uncommitted
# changes, else a timestamp), BUILDER=docker to build and push with a local docker instead of
# Cloud Build. `dataflow/build.sh context DIR` only assembles the build context into DIR (what
# the image is built from); `dataflow/build.sh tag` prints the default tag. Neither builds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

assemble() {  # the build context: only what the image needs, never .venv or tests
  local dir=$1
  mkdir -p "$dir/dataflow"
  cp -R "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/LICENSE" "$ROOT/decide" "$ROOT/segment_api" "$ROOT/transforms" "$ROOT/pipeline" \
    "$ROOT/schemas" "$ROOT/local_segment" "$ROOT/examples" "$dir/"
  cp "$ROOT/dataflow/launch.py" "$ROOT/dataflow/requirements.lock" "$dir/dataflow/"
  cp "$ROOT/dataflow/Dockerfile" "$dir/Dockerfile"  # Cloud Build's --tag wants it at the root
  find "$dir" -name __pycache__ -prune -exec rm -rf {} +
  # The checkout's compiled decide layer is for this machine: the image compiles its own.
  rm -f "$dir"/decide/*.so "$dir"/decide/*.c "$dir/decide/compiled.json"
}

default_tag() {  # an image built from uncommitted changes must say so in its tag
  local commit
  if commit=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null); then
    if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=normal 2>/dev/null)" ]; then
      echo "$commit-dirty-$(date -u +%Y%m%dT%H%M%SZ)"
    else
      echo "$commit"
    fi
  else
    echo "nogit-$(date -u +%Y%m%dT%H%M%SZ)"
  fi
}

case "${1:-}" in
  context) assemble "${2:?usage: dataflow/build.sh context DIR}"; exit 0 ;;
  tag) default_tag; exit 0 ;;
esac

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${REPOSITORY:?set REPOSITORY (Artifact Registry, docker)}"
: "${BUCKET:?set BUCKET (for the template spec)}"
TAG=${TAG:-$(default_tag)}
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/walkeros-segment:$TAG"
TEMPLATE="gs://$BUCKET/templates/walkeros-segment-$TAG.json"

# The template's parameters must be the pipeline's flags as they are now.
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
if [ -x "$PYTHON" ]; then
  "$PYTHON" "$ROOT/dataflow/metadata.py" --check
  "$PYTHON" "$ROOT/dataflow/lock.py" --check   # the lock must pin what constraints.txt pins
else
  echo "warning: $PYTHON not found; dataflow/metadata.json and the lock not checked" >&2
fi

CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
assemble "$CONTEXT"

if [ "${BUILDER:-cloudbuild}" = docker ]; then
  docker build --platform linux/amd64 -t "$IMAGE" "$CONTEXT"
  docker push "$IMAGE"
else
  gcloud builds submit "$CONTEXT" --tag "$IMAGE" --project "$PROJECT" --region "$REGION"
fi

gcloud dataflow flex-template build "$TEMPLATE" \
  --image "$IMAGE" \
  --sdk-language PYTHON \
  --metadata-file "$ROOT/dataflow/metadata.json" \
  --project "$PROJECT"

echo "image:    $IMAGE"
echo "template: $TEMPLATE"
echo "launch with --parameters sdk_container_image=$IMAGE (the workers then start from this image)"
