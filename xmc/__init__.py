"""LightXML-style extreme multi-label text classification with the MHE cascade head (``mhe-xmc``).

Modules: ``data`` (raw / XC BoW readers), ``datasets`` (WordNet-XMC builder), ``encoders`` (TF-IDF, HF),
``model`` (flat / MHC heads), ``train``, ``evaluate``, ``cli``, ``bench``, ``demo``.
"""
