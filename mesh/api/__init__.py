"""The configuration model: Istio-compatible kinds, strict validation, and the client of the apply API.

- `mesh.api.loader.load_paths` reads YAML documents from files, directories and stdin;
- `mesh.api.validate.validate_documents` checks each document (`check_document` for one);
- `mesh.api.crossref.check_subsets` checks references across documents;
- `mesh.api.client.ApiClient` talks to the control plane's apply API on its Unix socket.
Every error derives from `mesh.api.errors.ApiError` (a `MeshError`).
"""
