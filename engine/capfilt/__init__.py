"""CapFilt, the dataset bootstrapping of the BLIP paper (section 3.3), in one module per job; ``capfilt.py`` runs it.

``config`` (the YAML keys and their checks), ``scoring`` (captioner + filter over images: synthetic captions and
the score of every caption), ``selection`` (which captions are kept, score histograms, the pair writer),
``folder`` (the output folder: per-shard score files, their manifest, atomic writes, the wait for other ranks),
``report`` (the HTML page of kept and removed examples), ``json_list`` (web pairs from JSON annotation lists) and
``tar_shards`` (web pairs from webdataset tar shards, kept pairs written as tar shards).
"""
