"""Kubernetes manifests (kustomize) and the helpers they run: settings catalogue, migration job."""
