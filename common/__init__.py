"""Code shared by the EXAI router and its instances: settings, errors, Redis keys, fleet control."""

from pathlib import Path

__version__ = "0.1.0"

#: The repository (or source tree) root: schema.sql and deploy/ live here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
