"""Container image names, built in one place: the Makefile, the Dockerfile build and every component use these."""

import os

REGISTRY = os.environ.get("COUGHREG_REGISTRY", "ghcr.io/coughreg")
VERSION = os.environ.get("COUGHREG_IMAGE_TAG", "0.1.0")
CPU_IMAGE = f"{REGISTRY}/coughreg:{VERSION}-cpu"
GPU_IMAGE = f"{REGISTRY}/coughreg:{VERSION}-cuda"
