#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Install detectron2 v0.6 from the PyPI sdist ``pb1-detectron2==0.6`` without compiling ``_C``.

The sdist holds the official v0.6 Python sources without ``layers/csrc``; its ``setup.py`` always
tries to build ``detectron2._C`` and pins ``black==21.4b2``. This script therefore:

1. downloads the sdist from the package index pip uses (or takes ``--sdist FILE``), checks its
   pinned sha256,
2. copies the ``detectron2`` package, unmodified, into the active interpreter's site-packages,
3. adds ``detectron2/_C.py`` (``kd_detr/compat/detectron2_c_standin.py``), the one addition,
4. writes a ``detectron2-0.6.dist-info`` so ``pip`` and ``importlib.metadata`` see it.

Its runtime requirements are installed separately by ``tools/bootstrap.sh`` from
``requirements/constraints-cpu.txt``. Do not use this on a machine where detectron2 is built from
source: it refuses to overwrite a detectron2 that has a compiled ``_C``.
"""
import argparse
import hashlib
import html.parser
import os
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import urllib.parse
import urllib.request

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
PROJECT = "pb1-detectron2"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(REPO_ROOT, "projects", "kd_detr", "compat", "detectron2_c_standin.py")


class _LinkParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href")


def _index_urls():
    urls = [os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")]
    urls += os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    return [u for u in urls if u.startswith("http")]


def download_sdist(dest_dir):
    errors = []
    for index in _index_urls():
        page_url = index.rstrip("/") + f"/{PROJECT}/"
        try:
            with urllib.request.urlopen(page_url, timeout=60) as resp:
                parser = _LinkParser()
                parser.feed(resp.read().decode("utf-8", "replace"))
        except OSError as e:
            errors.append(f"{page_url}: {e}")
            continue
        for link in parser.links:
            url = urllib.parse.urljoin(page_url, link)
            if urllib.parse.urlparse(url).path.endswith("/" + SDIST_NAME):
                path = os.path.join(dest_dir, SDIST_NAME)
                print(f"[install_detectron2] downloading {url.split('#')[0]}", flush=True)
                with urllib.request.urlopen(url, timeout=300) as resp, open(path, "wb") as f:
                    shutil.copyfileobj(resp, f)
                return path
        errors.append(f"{page_url}: no link to {SDIST_NAME}")
    raise SystemExit(
        "Could not download detectron2's sdist from the package index:\n  "
        + "\n  ".join(errors)
        + f"\nDownload {SDIST_NAME} yourself and pass --sdist FILE."
    )


def verify_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        raise SystemExit(
            f"{path}: sha256 {digest.hexdigest()} does not match the pinned {SDIST_SHA256}; "
            "refusing to install it."
        )


def existing_detectron2(site_packages):
    pkg = os.path.join(site_packages, "detectron2")
    if not os.path.isdir(pkg):
        return None
    compiled = [f for f in os.listdir(pkg) if f.startswith("_C.") and not f.endswith(".py")]
    return "compiled" if compiled else "standin"


def install(sdist, site_packages):
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("pb1-detectron2-0.6/")]
            tar.extractall(tmp, members=members)
        src = os.path.join(tmp, "pb1-detectron2-0.6", "detectron2")
        dst = os.path.join(site_packages, "detectron2")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    shutil.copyfile(STANDIN, os.path.join(dst, "_C.py"))
    dist_info = os.path.join(site_packages, "detectron2-0.6.dist-info")
    shutil.rmtree(dist_info, ignore_errors=True)
    os.makedirs(dist_info)
    with open(os.path.join(dist_info, "METADATA"), "w") as f:
        f.write(
            "Metadata-Version: 2.1\nName: detectron2\nVersion: 0.6\n"
            f"Summary: detectron2 v0.6 Python sources from {SDIST_NAME} (sha256 {SDIST_SHA256}); "
            "_C is kd_detr's stand-in\n"
        )
    with open(os.path.join(dist_info, "INSTALLER"), "w") as f:
        f.write("kd_detr-tools-install_detectron2\n")
    files = []
    for root, _, names in os.walk(dst):
        files += [os.path.relpath(os.path.join(root, n), site_packages) for n in names]
    files += [os.path.join("detectron2-0.6.dist-info", n) for n in ("METADATA", "INSTALLER")]
    with open(os.path.join(dist_info, "RECORD"), "w") as f:
        f.write("".join(f"{p},,\n" for p in files + ["detectron2-0.6.dist-info/RECORD"]))
    print(f"[install_detectron2] installed detectron2 0.6 into {site_packages}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdist", help=f"a local {SDIST_NAME} (default: download it)")
    parser.add_argument("--force", action="store_true", help="reinstall over a stand-in install")
    args = parser.parse_args()

    site_packages = sysconfig.get_paths()["purelib"]
    state = existing_detectron2(site_packages)
    if state == "compiled":
        raise SystemExit(
            f"A detectron2 with a compiled _C is already installed in {site_packages}; "
            "not replacing it with the Python-only v0.6 sources."
        )
    if state == "standin" and not args.force:
        print("[install_detectron2] detectron2 (stand-in _C) already installed", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(tmp)
        verify_sha256(sdist)
        install(sdist, site_packages)


if __name__ == "__main__":
    sys.exit(main())
