-- Ad experiments join the catalogue: one entry per experiment (layer, traffic share, variants,
-- attribution window, audience), managed with PUT /admin/experiments/{id}.
ALTER TABLE catalogue_entries DROP CONSTRAINT IF EXISTS catalogue_entries_kind_check;
ALTER TABLE catalogue_entries
    ADD CONSTRAINT catalogue_entries_kind_check
        CHECK (kind IN ('region', 'item', 'store', 'promotion', 'experiment'));
