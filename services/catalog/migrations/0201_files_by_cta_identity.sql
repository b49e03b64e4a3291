-- Files by the identity of a CTA simulation.
-- The checker asks, for every request, which files share its identity
-- (site, array layout, particle, pointing, campaign). Through the GIN index
-- that meant intersecting the posting lists of values millions of files
-- share (every file of a site, of a particle): 120 ms a request with ten
-- million files. A btree of the six values finds the few hundred files of
-- the same pointing directly; the catalog asks a CTA identity through it
-- (`store::existing`), any other through the GIN index.
CREATE INDEX files_cta_identity ON files ((metadata -> 'MCCampaign'), (metadata -> 'array_layout'),
                                          (metadata -> 'particle'), (metadata -> 'site'),
                                          (metadata -> 'thetaP'), (metadata -> 'phiP'));
