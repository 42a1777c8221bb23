//! `callbridge.v1.Agents`: agents, number routes, the default agent.

use std::sync::Arc;

use callbridge_proto::pb;
use pb::agents_server::Agents;
use tonic::{Request, Response, Status};

use super::{Shared, decode_token, encode_token};
use crate::domain::call::now_ms;
use crate::domain::ids::AgentId;
use crate::error::Error;
use crate::store::{AgentCas, CallStore};
use crate::validate;

/// The `Agents` service.
pub(crate) struct AgentsApi<S>(pub(crate) Arc<Shared<S>>);

const SERVICE: &str = "Agents";

fn cas(outcome: AgentCas, agent_id: &AgentId, expected: u64) -> Result<(), Error> {
    match outcome {
        AgentCas::Done => Ok(()),
        AgentCas::NotFound => Err(Error::AgentNotFound(agent_id.to_string())),
        AgentCas::Conflict { current } => Err(Error::VersionConflict {
            agent_id: agent_id.to_string(),
            current,
            expected,
        }),
    }
}

#[tonic::async_trait]
impl<S: CallStore> Agents for AgentsApi<S> {
    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "CreateAgent", "", async {
                let agent_id = match AgentId::parse_optional("agent_id", req.agent_id)? {
                    Some(agent_id) => agent_id,
                    None => AgentId::generate(),
                };
                let settings = validate::agent_settings(req.settings)?;
                let now = now_ms();
                let agent = pb::Agent {
                    agent_id: agent_id.into_string(),
                    version: 1,
                    settings: Some(settings),
                    created_at_ms: now,
                    updated_at_ms: now,
                };
                if !self.0.store.create_agent(&agent).await? {
                    return Err(Error::AgentExists(agent.agent_id));
                }
                tracing::info!(agent_id = %agent.agent_id, "Agent created.");
                Ok(agent)
            })
            .await
    }

    async fn replace_agent(
        &self,
        request: Request<pb::ReplaceAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "ReplaceAgent", "", async {
                let agent_id = AgentId::parse("agent_id", req.agent_id)?;
                let settings = validate::agent_settings(req.settings)?;
                if req.expected_version == 0 {
                    return Err(Error::invalid(
                        "expected_version",
                        "is required (the version you read)",
                    ));
                }
                let current = self.0.agent(&agent_id).await?;
                let agent = pb::Agent {
                    agent_id: agent_id.to_string(),
                    version: req.expected_version + 1,
                    settings: Some(settings),
                    created_at_ms: current.created_at_ms,
                    updated_at_ms: now_ms(),
                };
                let outcome = self
                    .0
                    .store
                    .replace_agent(&agent, req.expected_version)
                    .await?;
                cas(outcome, &agent_id, req.expected_version)?;
                Ok(agent)
            })
            .await
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "GetAgent", "", async {
                let agent_id = AgentId::parse("agent_id", req.agent_id.as_str())?;
                self.0.agent(&agent_id).await
            })
            .await
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "ListAgents", "", async {
                let limit = validate::page_size("page_size", req.page_size)?;
                let after = if req.page_token.is_empty() {
                    None
                } else {
                    let not_ours = || Error::invalid("page_token", "not a token from this API");
                    let id = decode_token(&req.page_token).ok_or_else(not_ours)?;
                    Some(AgentId::parse("page_token", id).map_err(|_| not_ours())?)
                };
                // One extra tells whether another page exists.
                let mut agents = self.0.store.list_agents(after.as_ref(), limit + 1).await?;
                let next_page_token = if agents.len() > limit {
                    agents.truncate(limit);
                    agents
                        .last()
                        .map(|a| encode_token(&a.agent_id))
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                Ok(pb::ListAgentsResponse {
                    agents,
                    next_page_token,
                })
            })
            .await
    }

    async fn delete_agent(
        &self,
        request: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<pb::DeleteAgentResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "DeleteAgent", "", async {
                let agent_id = AgentId::parse("agent_id", req.agent_id)?;
                let outcome = self
                    .0
                    .store
                    .delete_agent(&agent_id, req.expected_version)
                    .await?;
                cas(outcome, &agent_id, req.expected_version)?;
                Ok(pb::DeleteAgentResponse {})
            })
            .await
    }

    async fn set_number_route(
        &self,
        request: Request<pb::NumberRoute>,
    ) -> Result<Response<pb::NumberRoute>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "SetNumberRoute", "", async {
                validate::e164("number", &req.number)?;
                let agent_id = AgentId::parse("agent_id", req.agent_id.as_str())?;
                self.0.agent(&agent_id).await?;
                self.0.store.set_route(&req.number, &agent_id).await?;
                Ok(req)
            })
            .await
    }

    async fn delete_number_route(
        &self,
        request: Request<pb::DeleteNumberRouteRequest>,
    ) -> Result<Response<pb::DeleteNumberRouteResponse>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "DeleteNumberRoute", "", async {
                validate::e164("number", &req.number)?;
                if !self.0.store.delete_route(&req.number).await? {
                    return Err(Error::RouteNotFound(req.number));
                }
                Ok(pb::DeleteNumberRouteResponse {})
            })
            .await
    }

    async fn list_number_routes(
        &self,
        _request: Request<pb::ListNumberRoutesRequest>,
    ) -> Result<Response<pb::ListNumberRoutesResponse>, Status> {
        self.0
            .rpc(SERVICE, "ListNumberRoutes", "", async {
                let routes = self
                    .0
                    .store
                    .list_routes()
                    .await?
                    .into_iter()
                    .map(|(number, agent_id)| pb::NumberRoute {
                        number,
                        agent_id: agent_id.into_string(),
                    })
                    .collect();
                Ok(pb::ListNumberRoutesResponse { routes })
            })
            .await
    }

    async fn set_default_agent(
        &self,
        request: Request<pb::DefaultAgent>,
    ) -> Result<Response<pb::DefaultAgent>, Status> {
        let req = request.into_inner();
        self.0
            .rpc(SERVICE, "SetDefaultAgent", "", async {
                match AgentId::parse_optional("agent_id", req.agent_id.as_str())? {
                    None => self.0.store.set_default_agent(None).await?,
                    Some(agent_id) => {
                        self.0.agent(&agent_id).await?;
                        self.0.store.set_default_agent(Some(&agent_id)).await?;
                    }
                }
                Ok(req)
            })
            .await
    }

    async fn get_default_agent(
        &self,
        _request: Request<pb::GetDefaultAgentRequest>,
    ) -> Result<Response<pb::DefaultAgent>, Status> {
        self.0
            .rpc(SERVICE, "GetDefaultAgent", "", async {
                Ok(pb::DefaultAgent {
                    agent_id: self
                        .0
                        .store
                        .get_default_agent()
                        .await?
                        .map(AgentId::into_string)
                        .unwrap_or_default(),
                })
            })
            .await
    }
}
