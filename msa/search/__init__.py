"""Search an image archive: the web front end (``msa.search.serve``)."""
