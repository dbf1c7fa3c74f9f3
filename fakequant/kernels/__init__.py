"""Fast paths of ``quant_dequant``; each backend lives in its own subpackage and registers through
``fakequant.dispatch``. Importing this package imports no backend (Triton is imported lazily)."""
