# Copyright (c) kd_detr contributors.
"""The docs cannot go stale silently: every repository path and every config key that README.md
and docs/*.md name in backticks (or in a fenced command block) exists."""
import glob
import itertools
import os
import re
import unittest

import detectron2

from kd_detr.config import load_config

from .common import REPO_ROOT

DOCS = [os.path.join(REPO_ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))
)
# Where a relative path is looked up: the repository, the package and its parent
# (docs/ARCHITECTURE.md names modules as `distill/interface.py` and `kd_detr/__init__.py`), and
# the installed detectron2 (docs/DETECTRON2_COMPAT.md names the v0.6 files it differs in, such
# as `structures/masks.py`).
ROOTS = (
    REPO_ROOT,
    os.path.join(REPO_ROOT, "projects", "kd_detr"),
    os.path.join(REPO_ROOT, "projects"),
    os.path.dirname(detectron2.__file__),
    os.path.dirname(os.path.dirname(detectron2.__file__)),
)
PATH_SUFFIXES = (
    ".py", ".yaml", ".md", ".sh", ".txt", ".cfg", ".toml", ".json", ".npy", ".pkl", ".pth",
)  # fmt: skip
# Paths the docs name on purpose although they are not in the repository; each is written by a
# command or chosen by the user, never committed:
NOT_IN_REPO = (
    "path/",  # placeholders for the user's own files ("path/instances.json", "path/to/...")
    "output/",  # training outputs (OUTPUT_DIR, git-ignored)
    "OUTPUT_DIR/",  # the same, named by the config key
    "out/",  # the --output folder of a tools/ command in an example
    "datasets/",  # $DETECTRON2_DATASETS (default ./datasets): COCO, LVIS, text embeddings
    "converted/",  # ImageNet backbones written by tools/convert_resnet_to_d2.py (README "ResNet")
    "../shared/",  # shared data next to the checkout (real COCO images, BCCD, CLIP embeddings)
    "~/",  # the cache ($KD_DETR_DATA, default ~/.cache/kd_detr)
    "$",  # environment variables ($KD_DETR_DATA/..., $DETECTRON2_DATASETS/...)
    "http://",
    "https://",
    # The stand-in tools/install_detectron2.py writes into the v0.6 install (upstream has none).
    "detectron2/_C.py",
)
# Dotted upper-case names the docs use that are not keys of the default config, on purpose:
NOT_CONFIG_KEYS = {
    # docs/ARCHITECTURE.md "How to add a dataset source": the key a new source would add.
    "DATASETS.MY_SOURCE",
    # README.md "Training and evaluation": the example of a typo and the error it gives.
    "MODEL.KD.TEMPERATUR",
}
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
KEY = re.compile(r"^[A-Z][A-Z0-9_]*(?:\.[A-Z][A-Z0-9_]*)+(?:\.\*)?$")


def _spans(text):
    """Inline code spans, and the whitespace-separated words of fenced blocks."""
    blocks = FENCE.findall(text)
    inline = INLINE.findall(FENCE.sub("", text))
    return inline, [w for b in blocks for w in b.split()]


def _expand(word):
    """Brace expansion as the shell does it: `a_{18,50}.yaml` -> a_18.yaml, a_50.yaml."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not match:
        return [word]
    head, tail = word[: match.start()], word[match.end() :]
    return list(
        itertools.chain.from_iterable(_expand(head + p + tail) for p in match.group(1).split(","))
    )


def _looks_like_path(word):
    """A word with a "/" that ends like a file of PATH_SUFFIXES, or with "/" (a folder)."""
    word = word.strip("()[],;:'\"`")
    word = re.sub(r"^[A-Z_]+=", "", word)  # an environment assignment: CFG=configs/...
    # "<...>" marks a template, not a path: "How to add" in docs/ARCHITECTURE.md names the files
    # a new method or variant creates (`distill/<method>.py`).
    if "/" not in word or len(word) < 3 or "<" in word:
        return None
    if word.endswith("/") or word.split("?")[0].endswith(PATH_SUFFIXES):
        return word
    return None


def doc_paths(text):
    inline, fenced = _spans(text)
    words = [w for span in inline for w in span.split()] + fenced
    return sorted({p for p in map(_looks_like_path, words) if p})


def doc_keys(text):
    inline, _ = _spans(text)
    keys = set()
    for span in inline:
        first = span.split()[0] if span.split() else ""
        for key in _expand(first.rstrip(",.:")):
            if KEY.match(key):
                keys.add(key)
    return sorted(keys)


def doc_commands(text):
    """(script, [--flags]) of every `python <script>.py ...` line of the fenced blocks (with its
    backslash continuations)."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split("#")[0].split()
            if "python" in words[:3] and any(w.endswith(".py") for w in words):
                script = next(w for w in words if w.endswith(".py"))
                flags = [w.split("=")[0] for w in words if re.match(r"^--[a-z][a-z0-9-]*", w)]
                commands.append((script, flags))
    return commands


def path_exists(path):
    if path.startswith(NOT_IN_REPO):
        return True
    for candidate in _expand(path.rstrip("/")):
        found = any(glob.glob(os.path.join(root, candidate)) for root in ROOTS)
        if not found:
            return False
    return True


def key_exists(cfg, key):
    node = cfg
    for part in key.split("."):
        if part == "*":
            return isinstance(node, dict)
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


class TestDocs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = {}
        for path in DOCS:
            with open(path) as f:
                cls.docs[os.path.relpath(path, REPO_ROOT)] = f.read()
        cls.cfg = load_config(register_datasets=False)

    def test_the_parser_finds_what_the_docs_name(self):
        # Guards against a parser that silently finds nothing (and so checks nothing).
        readme = self.docs["README.md"]
        self.assertIn("configs/kd_detr/kd_dab_detr_efflite0_from_efflite2_demo.yaml",
                      doc_paths(readme))  # fmt: skip
        self.assertIn("tools/print_metrics.py", doc_paths(readme))
        self.assertIn("MODEL.KD.ENABLED", doc_keys(readme))
        self.assertIn(("train_net.py", ["--config-file", "--eval-only"]), doc_commands(readme))
        self.assertEqual(_expand("a_{18,50}_b.yaml"), ["a_18_b.yaml", "a_50_b.yaml"])
        self.assertFalse(path_exists("configs/no_such_recipe.yaml"))
        self.assertFalse(key_exists(self.cfg, "MODEL.KD.NO_SUCH_KEY"))

    def test_every_named_repository_path_exists(self):
        missing = [
            f"{doc}: `{path}`"
            for doc, text in self.docs.items()
            for path in doc_paths(text)
            if not path_exists(path)
        ]
        self.assertEqual(missing, [], "paths named in the docs that are not in the repository")

    def test_every_named_config_key_exists(self):
        missing = [
            f"{doc}: `{key}`"
            for doc, text in self.docs.items()
            for key in doc_keys(text)
            if key not in NOT_CONFIG_KEYS and not key_exists(self.cfg, key)
        ]
        self.assertEqual(missing, [], "config keys named in the docs that load_config() lacks")

    def test_every_relative_link_resolves(self):
        broken = []
        for doc, text in self.docs.items():
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                target = target.split("#")[0]
                if not target or "://" in target or target.startswith("mailto:"):
                    continue
                if not os.path.exists(os.path.join(REPO_ROOT, os.path.dirname(doc), target)):
                    broken.append(f"{doc}: ({target})")
        self.assertEqual(broken, [], "markdown links to files that do not exist")

    def test_every_documented_command_flag_exists(self):
        # train_net.py takes Detectron2's default_argument_parser() flags.
        with open(os.path.join(os.path.dirname(detectron2.__file__), "engine", "defaults.py")) as f:
            detectron2_flags = f.read()
        wrong = []
        for doc, text in self.docs.items():
            for script, flags in doc_commands(text):
                path = os.path.join(REPO_ROOT, script)
                if not os.path.isfile(path):
                    wrong.append(f"{doc}: {script} does not exist")
                    continue
                with open(path) as f:
                    source = f.read() + (detectron2_flags if script == "train_net.py" else "")
                # kd_bench.py and kd_demo.py take the shared flags of tools/bench/cli.py.
                if "add_bench_args" in source:
                    with open(os.path.join(REPO_ROOT, "tools", "bench", "cli.py")) as f:
                        source += f.read()
                wrong += [
                    f"{doc}: {script} {flag}"
                    for flag in flags
                    if f'"{flag}"' not in source and f"'{flag}'" not in source
                ]
        self.assertEqual(wrong, [], "documented commands whose script or flag does not exist")

    def test_license_matches_setup_cfg(self):
        with open(os.path.join(REPO_ROOT, "setup.cfg")) as f:
            self.assertIn("license = Apache-2.0", f.read())
        with open(os.path.join(REPO_ROOT, "LICENSE")) as f:
            text = f.read()
        self.assertIn("Apache License", text)
        self.assertIn("Version 2.0, January 2004", text)
        self.assertIn("END OF TERMS AND CONDITIONS", text)


if __name__ == "__main__":
    unittest.main()
