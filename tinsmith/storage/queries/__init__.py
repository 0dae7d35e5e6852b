"""MetadataStore's queries, one module per resource; each is a mixin over `base.StoreBase`,
and tinsmith.storage.db.MetadataStore combines them."""
