//! The catalog, asked over gRPC what it holds of each identity of the files
//! a batch's requests would write.

use anyhow::Context;
use prodsys_auth::Channel;
use prodsys_proto as pb;

use crate::domain::{CatalogAnswer, Held, Prepared};

/// Most identities asked of the catalog in one call (its limit).
const QUERIES_PER_CALL: usize = 1000;

#[derive(Clone)]
pub struct Catalog {
    pub client: pb::catalog_service_client::CatalogServiceClient<Channel>,
}

fn held(r: pb::FindExistingResponse) -> Held {
    Held {
        file_count: r.file_count,
        total_bytes: r.total_bytes,
        production_ids: r.production_ids,
        example_lfns: r.example_lfns,
        missing_keys: r.missing_keys,
        last_run: r.last_run,
        differing_production_ids: r.differing_production_ids,
        differing_keys: r.differing_keys,
    }
}

impl Catalog {
    /// What the catalog holds of each prepared candidate's simulation, per
    /// identity of its files, for those that need asking (checked, with a
    /// catalog identity): one call for the whole batch, made before the
    /// decisions take the checker's lock. The catalog down or slow is a
    /// transient error (waited out), never a verdict on the requests.
    pub async fn ask(
        &self,
        prepared: &[Prepared<'_>],
    ) -> anyhow::Result<Vec<Option<CatalogAnswer>>> {
        let mut asked = Vec::new();
        let mut queries = Vec::new();
        // Extensions too: their runs must follow those the catalog holds.
        for (i, p) in prepared.iter().enumerate() {
            let Some((profile, parameters, _)) = &p.checked else {
                continue;
            };
            for identity in profile.file_identities(parameters) {
                asked.push((i, identity.label));
                queries.push(identity.query.into());
            }
        }
        let mut found: Vec<Option<CatalogAnswer>> = vec![None; prepared.len()];
        let mut answers = Vec::with_capacity(queries.len());
        while !queries.is_empty() {
            let rest = queries.split_off(queries.len().min(QUERIES_PER_CALL));
            let chunk = std::mem::replace(&mut queries, rest);
            let expected = chunk.len();
            let results = match self
                .client
                .clone()
                .find_existing_many(pb::FindExistingManyRequest {
                    queries: chunk.clone(),
                })
                .await
            {
                Ok(answer) => answer.into_inner().results,
                // A catalog older than FindExistingMany (during an upgrade):
                // one call per request, as before it.
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    let mut results = Vec::with_capacity(chunk.len());
                    for query in chunk {
                        results.push(
                            self.client
                                .clone()
                                .find_existing(query)
                                .await
                                .context("asking the catalog for existing outputs")?
                                .into_inner(),
                        );
                    }
                    results
                }
                Err(status) => {
                    let transient = prodsys_messaging::error::status_is_transient(&status);
                    let error = anyhow::Error::new(status)
                        .context("asking the catalog for existing outputs");
                    return Err(match transient {
                        true => prodsys_messaging::Transient::wrap(error),
                        false => error,
                    });
                }
            };
            anyhow::ensure!(
                results.len() == expected,
                "the catalog answered {} of {expected} queries",
                results.len()
            );
            answers.extend(results);
        }
        for ((i, label), answer) in asked.into_iter().zip(answers) {
            found[i]
                .get_or_insert_with(Vec::new)
                .push((label, held(answer)));
        }
        Ok(found)
    }
}
