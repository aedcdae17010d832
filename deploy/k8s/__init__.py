"""Kubernetes: the Helm chart's manifests rendered and checked without helm (`raymoe k8s`)."""
