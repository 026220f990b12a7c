"""Container plumbing shared by both experiments: the Docker engine connection, image building (probe,
driver and vLLM server images), the host wheelhouse, container memory statistics."""
