"""Moved to :mod:`eqat_cli.train.e2e_qp.runner`; kept so that older imports keep working."""

from eqat_cli.train.e2e_qp.runner import DATA_FORMATS, e2e_qp_from_spec, load_teacher  # noqa: F401
