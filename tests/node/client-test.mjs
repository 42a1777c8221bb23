// Exercises the callbridge public API the way the company's Node/Express app will:
// @grpc/grpc-js with the project's own .proto loaded at runtime (no generated code).
//
//   CONTROL_ADDR=127.0.0.1:50051 CONTROL_APP_TOKEN=… node client-test.mjs
//
// Steps: a wrong token is refused; create an agent; create a call with it; read the call
// back and compare; a command to the not-yet-live call is refused; open WatchCall and wait
// until the call's `started` event, send it a `say` command, then wait for its
// `command_applied` and `ended` events and the end of the stream (something acting as the
// relay must produce them); read the call again and check it ended the way the events said.
//
// stdout is line-oriented so a driving test can follow along:
//   `ok <step> …`        a step passed
//   `WATCHING <call_id>` the watch stream is open (the server has answered with headers)
//   `EVENT <seq> <kind>` one event seen by the watcher
//   `COMMAND <id>`       the live command was accepted with this id
//   `FAIL <what>`        a mismatch or error; the exit code is then non-zero
//   `PASS`               everything matched
// Exit codes: 0 pass, 1 mismatch or error, 64 missing/invalid settings.
//
// Environment:
//   CONTROL_ADDR          host:port of the control plane (required)
//   CONTROL_APP_TOKEN     bearer token for the public API (required)
//   CONTROL_TLS           `true`: TLS with the system roots (default plaintext, as on loopback)
//   RELAY_PUBLIC_URL      when set, the exact base the webhook and stream URLs must use
//   CALLBRIDGE_PROTO      path of callbridge.proto (default: the one in this repository)
//   RPC_TIMEOUT_MS        deadline of each unary call (default 5000)
//   WATCH_TIMEOUT_MS      how long to wait for the watch to see `ended` (default 20000)

import { fileURLToPath } from 'node:url';
import path from 'node:path';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));
const protoFile =
  process.env.CALLBRIDGE_PROTO ??
  path.join(here, '..', '..', 'proto', 'proto', 'callbridge', 'v1', 'callbridge.proto');

class Mismatch extends Error {}
// Bad or missing settings: exit 64 (EX_USAGE), as the project's binaries do.
class ConfigError extends Error {}

function envInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number.parseInt(raw, 10);
  if (!Number.isFinite(n) || n <= 0) throw new ConfigError(`${name} must be a positive integer, got ${raw}`);
  return n;
}

function required(name) {
  const v = process.env[name];
  if (!v) throw new ConfigError(`${name} is not set`);
  return v;
}

function expectEq(what, got, want) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) throw new Mismatch(`${what}: expected ${w}, got ${g}`);
}

function expectThat(what, ok, detail) {
  if (!ok) throw new Mismatch(`${what}: ${detail}`);
}

// Map keys arrive in whatever order the server encoded them; compare them sorted.
function sortedEntries(obj) {
  return Object.entries(obj ?? {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

function loadApi() {
  const def = protoLoader.loadSync(protoFile, {
    // Field names as written in the .proto (`call_id`), as the app's code uses them.
    keepCase: true,
    // uint64/int64 as decimal strings: exact, and what JSON-minded app code expects.
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).callbridge.v1;
}

function unary(client, method, request, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + timeoutMs }, (err, res) =>
      err ? reject(err) : resolve(res),
    );
  });
}

function statusName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) ?? String(code);
}

async function expectStatus(what, promise, wantCode) {
  try {
    await promise;
  } catch (err) {
    expectEq(`${what} status`, statusName(err.code), statusName(wantCode));
    return err;
  }
  throw new Mismatch(`${what}: expected ${statusName(wantCode)}, the call succeeded`);
}

function bearer(token) {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${token}`);
  return md;
}

// Opens WatchCall and resolves with the events once the server closes the stream;
// `onEvent` sees each event as it arrives.
function watchCall(calls, callId, metadata, timeoutMs, onEvent) {
  return new Promise((resolve, reject) => {
    const events = [];
    const stream = calls.WatchCall({ call_id: callId, after_seq: '0' }, metadata);
    const timer = setTimeout(() => {
      stream.cancel();
      const seen = events.map((e) => `${e.seq}:${e.kind}`).join(', ') || 'none';
      reject(new Mismatch(`WatchCall: no end of stream within ${timeoutMs} ms (events seen: ${seen})`));
    }, timeoutMs);
    // Response headers mean the server accepted the watch and its handler is running.
    stream.on('metadata', () => console.log(`WATCHING ${callId}`));
    stream.on('data', (ev) => {
      console.log(`EVENT ${ev.seq} ${ev.kind}`);
      events.push(ev);
      onEvent(ev);
    });
    stream.on('error', (err) => {
      clearTimeout(timer);
      reject(new Mismatch(`WatchCall failed: ${statusName(err.code)} ${err.details}`));
    });
    stream.on('end', () => {
      clearTimeout(timer);
      resolve(events);
    });
  });
}

function agentSettings(runId) {
  return {
    name: `node client test ${runId}`,
    model: 'gpt-realtime',
    voice: 'coral',
    instructions: 'You are a polite receptionist for a dental practice. Keep answers short.',
    temperature: 0.8,
    greeting: 'Hello, thanks for calling. How can I help?',
    turn_detection: { type: 'SERVER_VAD', threshold: 0.5, silence_duration_ms: 500 },
    input_transcription_model: 'gpt-4o-mini-transcribe',
    tools: [
      {
        name: 'book_appointment',
        description: 'Books an appointment.',
        parameters_json: '{"type":"object","properties":{"day":{"type":"string"}}}',
      },
    ],
    builtin_tools: { end_call: true, transfer_call: true, transfer_numbers: ['+14155550100'] },
    max_call_duration_secs: 600,
    fallback: { say: { text: 'Sorry, please call again later.', voice: '', language: 'en-US' } },
    realtime_enabled: true,
  };
}

function checkAgentSettings(what, got, want) {
  for (const field of ['name', 'model', 'voice', 'instructions', 'greeting', 'input_transcription_model']) {
    expectEq(`${what}.${field}`, got[field], want[field]);
  }
  expectEq(`${what}.temperature`, got.temperature, want.temperature);
  expectEq(`${what}.max_call_duration_secs`, got.max_call_duration_secs, want.max_call_duration_secs);
  expectEq(`${what}.realtime_enabled`, got.realtime_enabled, want.realtime_enabled);
  expectEq(`${what}.turn_detection.type`, got.turn_detection?.type, want.turn_detection.type);
  expectEq(`${what}.tools`, got.tools.map((t) => [t.name, t.description, t.parameters_json]),
    want.tools.map((t) => [t.name, t.description, t.parameters_json]));
  // Compared field by field: decoded objects list repeated fields first.
  for (const field of ['end_call', 'transfer_call', 'transfer_numbers']) {
    expectEq(`${what}.builtin_tools.${field}`, got.builtin_tools?.[field], want.builtin_tools[field]);
  }
  expectEq(`${what}.fallback.action`, got.fallback?.action, 'say');
  expectEq(`${what}.fallback.say.text`, got.fallback?.say?.text, want.fallback.say.text);
}

// Every field the app relies on after a read-back, compared with what CreateCall returned.
const CALL_FIELDS = ['call_id', 'agent_id', 'direction', 'status', 'from', 'to', 'campaign_id', 'created_at_ms'];

async function main() {
  const addr = required('CONTROL_ADDR');
  const token = required('CONTROL_APP_TOKEN');
  const rpcTimeout = envInt('RPC_TIMEOUT_MS', 5000);
  const watchTimeout = envInt('WATCH_TIMEOUT_MS', 20000);
  const creds =
    process.env.CONTROL_TLS === 'true' ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();

  const api = loadApi();
  const agents = new api.Agents(addr, creds);
  const calls = new api.Calls(addr, creds);
  const md = bearer(token);
  const runId = `${process.pid}-${Date.now()}`;
  console.log(`ok loaded ${path.relative(process.cwd(), protoFile)}; control at ${addr}`);

  try {
    // 1. The API refuses a caller without the right token.
    await expectStatus(
      'ListAgents with a wrong token',
      unary(agents, 'ListAgents', { page_size: 1 }, bearer(`${token}-wrong`), rpcTimeout),
      grpc.status.UNAUTHENTICATED,
    );
    console.log('ok wrong token refused with UNAUTHENTICATED');

    // 2. Create an agent.
    const settings = agentSettings(runId);
    const agent = await unary(agents, 'CreateAgent', { agent_id: '', settings }, md, rpcTimeout);
    expectThat('CreateAgent.agent_id', agent.agent_id !== '', 'empty; a generated id was expected');
    expectEq('CreateAgent.version', agent.version, '1');
    expectThat('CreateAgent.created_at_ms', Number(agent.created_at_ms) > 0, `got ${agent.created_at_ms}`);
    checkAgentSettings('CreateAgent.settings', agent.settings, settings);
    const fetchedAgent = await unary(agents, 'GetAgent', { agent_id: agent.agent_id }, md, rpcTimeout);
    expectEq('GetAgent.version', fetchedAgent.version, agent.version);
    checkAgentSettings('GetAgent.settings', fetchedAgent.settings, settings);
    console.log(`ok CreateAgent agent_id=${agent.agent_id} version=${agent.version}`);

    // 3. Create an outbound call with it.
    const callReq = {
      agent_id: agent.agent_id,
      direction: 'OUTBOUND',
      from: '+14155550111',
      to: '+14155550122',
      campaign_id: `node-${runId}`,
      metadata: { crm_id: 'lead-42', source: 'node-client-test' },
    };
    const created = await unary(calls, 'CreateCall', callReq, md, rpcTimeout);
    const call = created.call;
    expectThat('CreateCall.call', call != null, 'missing');
    expectThat('CreateCall.call.call_id', call.call_id !== '', 'empty');
    expectEq('CreateCall.call.agent_id', call.agent_id, agent.agent_id);
    expectEq('CreateCall.call.direction', call.direction, 'OUTBOUND');
    expectEq('CreateCall.call.status', call.status, 'CREATED');
    expectEq('CreateCall.call.from', call.from, callReq.from);
    expectEq('CreateCall.call.to', call.to, callReq.to);
    expectEq('CreateCall.call.campaign_id', call.campaign_id, callReq.campaign_id);
    expectEq('CreateCall.call.metadata', sortedEntries(call.metadata), sortedEntries(callReq.metadata));
    expectEq('CreateCall.call.last_seq', call.last_seq, '0');
    const id = encodeURIComponent(call.call_id);
    expectThat('CreateCall.webhook_url', created.webhook_url.endsWith(`/api/twilio/voice?callId=${id}`),
      `got ${created.webhook_url}`);
    expectThat('CreateCall.stream_url', /^wss?:\/\//.test(created.stream_url) &&
      created.stream_url.endsWith(`/api/twilio/media-stream/${id}`), `got ${created.stream_url}`);
    const publicUrl = process.env.RELAY_PUBLIC_URL;
    if (publicUrl) {
      const base = publicUrl.replace(/\/+$/, '');
      expectEq('CreateCall.webhook_url', created.webhook_url, `${base}/api/twilio/voice?callId=${id}`);
      const wsBase = base.replace(/^https:/, 'wss:').replace(/^http:/, 'ws:');
      expectEq('CreateCall.stream_url', created.stream_url, `${wsBase}/api/twilio/media-stream/${id}`);
    }
    console.log(`ok CreateCall call_id=${call.call_id} webhook_url=${created.webhook_url}`);

    // 4. Read it back.
    const fetched = await unary(calls, 'GetCall', { call_id: call.call_id }, md, rpcTimeout);
    for (const f of CALL_FIELDS) expectEq(`GetCall.${f}`, fetched[f], call[f]);
    expectEq('GetCall.metadata', sortedEntries(fetched.metadata), sortedEntries(callReq.metadata));
    await expectStatus(
      'GetCall of an unknown id',
      unary(calls, 'GetCall', { call_id: `no-such-call-${runId}` }, md, rpcTimeout),
      grpc.status.NOT_FOUND,
    );
    console.log(`ok GetCall matches; unknown id is NOT_FOUND`);

    // 5. A command needs a live call: this one has not started yet.
    const say = { call_id: call.call_id, command: { command_id: '', say: { text: 'Please hold for a moment.' } } };
    await expectStatus(
      'SendCommand before the call started',
      unary(calls, 'SendCommand', say, md, rpcTimeout),
      grpc.status.FAILED_PRECONDITION,
    );
    console.log('ok SendCommand to a call not yet live is FAILED_PRECONDITION');

    // 6. Watch it until it ends; once it has started, send it a live command, which the
    // relay applies (a `command_applied` event) before the call ends.
    let sent = null;
    const events = await watchCall(calls, call.call_id, md, watchTimeout, (ev) => {
      if (ev.kind === 'started' && sent === null) {
        sent = unary(calls, 'SendCommand', say, md, rpcTimeout).then(
          (res) => {
            console.log(`COMMAND ${res.command_id}`);
            return res;
          },
          (err) => {
            console.log(`COMMAND failed: ${statusName(err.code)} ${err.details}`);
            throw err;
          },
        );
        // Checked after the watch; keep an early failure from counting as unhandled.
        sent.catch(() => {});
      }
    });
    expectThat('SendCommand', sent !== null, 'never sent: no started event was seen');
    const { command_id: commandId } = await sent;
    expectThat('SendCommand.command_id', commandId !== '', 'empty; control must assign one');
    expectThat('WatchCall events', events.length >= 3, `expected started, command_applied and ended, got ${events.length}`);
    events.forEach((ev, i) => {
      expectEq(`WatchCall event[${i}].call_id`, ev.call_id, call.call_id);
      expectEq(`WatchCall event[${i}].seq`, ev.seq, String(i + 1));
    });
    expectEq('WatchCall first event', events[0].kind, 'started');
    const last = events[events.length - 1];
    expectEq('WatchCall last event', last.kind, 'ended');
    const applied = events.filter((ev) => ev.kind === 'command_applied');
    expectEq('WatchCall command_applied ids', applied.map((ev) => ev.command_applied.command_id), [commandId]);
    console.log(`ok SendCommand command_id=${commandId} applied at seq ${applied[0].seq}`);
    console.log(`ok WatchCall saw ${events.length} events, started … ended(${last.ended.reason})`);

    // 7. The stored call agrees with what the watcher saw.
    const ended = await unary(calls, 'GetCall', { call_id: call.call_id }, md, rpcTimeout);
    const reason = last.ended.reason;
    const wantStatus = reason === 'INTERNAL_ERROR' ? 'FAILED' : reason === 'HANDOFF' ? 'IN_PROGRESS' : 'COMPLETED';
    expectEq('GetCall after end: status', ended.status, wantStatus);
    expectEq('GetCall after end: end_reason', ended.end_reason, reason);
    expectEq('GetCall after end: last_seq', ended.last_seq, last.seq);
    expectEq('GetCall after end: twilio_call_sid', ended.twilio_call_sid, events[0].started.twilio_call_sid);
    expectThat('GetCall after end: ended_at_ms', Number(ended.ended_at_ms) > 0, `got ${ended.ended_at_ms}`);
    console.log(`ok GetCall after end: status=${ended.status} end_reason=${ended.end_reason} last_seq=${ended.last_seq}`);
  } finally {
    agents.close();
    calls.close();
  }
  console.log('PASS');
}

main().then(
  () => process.exit(0),
  (err) => {
    if (err instanceof ConfigError) {
      console.log(`FAIL ${err.message}`);
      process.exit(64);
    }
    if (err instanceof Mismatch) {
      console.log(`FAIL ${err.message}`);
    } else if (err && typeof err.code === 'number') {
      console.log(`FAIL gRPC ${statusName(err.code)}: ${err.details ?? err.message}`);
    } else {
      console.log(`FAIL ${err?.stack ?? err}`);
    }
    process.exit(1);
  },
);
