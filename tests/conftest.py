"""Test-wide fixtures.

Detectron2's ``setup_logger`` (called by ``train_net.main``, the tools' ``main`` functions and
``default_setup``) turns ``propagate`` off on the loggers it configures. A test that ran one of
them in-process would leave its loggers unseen by pytest's ``caplog`` for every later test; the
fixture below gives each test the propagation it found.
"""
import logging

import pytest

_CONFIGURED_LOGGERS = ("kd_detr", "detectron2", "fvcore", "d2")


@pytest.fixture(autouse=True)
def _keep_log_propagation():
    loggers = [logging.getLogger(name) for name in _CONFIGURED_LOGGERS]
    before = [logger.propagate for logger in loggers]
    yield
    for logger, propagate in zip(loggers, before):
        logger.propagate = propagate
