"""Everything `make images` builds (`harness images`): probe images, the driver image, vLLM server images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import docker

from harness.containers import images, vllm_image
from harness.measure.allocators import KNOWN


def build(device: str = "cpu", allocators: Iterable[str] = KNOWN, rebuild: bool = False, driver: bool = True,
          vllm: bool = False, vllm_only: bool = False, log: images.Log = print) -> None:
    """What `make images` builds (`harness images`): the probe images for `allocators`, the driver image, and
    with `vllm` the vLLM server image (CPU: harness-vllm:cpu and one harness-vllm:cpu-<allocator> per
    allocator; cuda: the official image). ImageError or WheelhouseError when something cannot be built."""
    names = list(allocators)
    client = docker.from_env(timeout=1800)
    try:
        built: list[Any] = []
        if not vllm_only:
            built += images.ensure_images(client, names, images.variant_for(device), rebuild).values()
            if driver:
                log(f"images: {images.DRIVER_TAG:28} {images.ensure_driver(client, rebuild).id[:19]}")
        if vllm or vllm_only:
            server = vllm_image.ensure(client, images.variant_for(device), rebuild, pull=True)
            built.append(server)
            if server.variant == "cpu":  # serve --allocators: one server image per allocator
                built += [vllm_image.ensure_allocator(client, server, name, rebuild) for name in names]
    finally:
        client.close()
    for image in built:
        log(f"images: {image.tag:28} {image.id[:19]}  LD_PRELOAD={getattr(image, 'library', None) or '-'}")
