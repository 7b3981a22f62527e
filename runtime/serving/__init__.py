"""Serving: batched queries against one gallery (:mod:`.service`, :mod:`.batching`), the HTTP
server with its metrics and search page (:mod:`.server`, :mod:`.metrics`, ``page.html``), and
Triton (:mod:`.triton`, :mod:`.triton_env`). The top layer: it may import every other."""
