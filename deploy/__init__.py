"""Deployment: the pdserve CLI, topology schema and Ray orchestration."""
