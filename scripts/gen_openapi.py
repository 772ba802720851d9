"""Regenerates src/http/openapi.json (run from anywhere: python3 scripts/gen_openapi.py)."""
import os
import json
def p(name, desc, schema=None, required=False, where="query", explode=None):
    d={"name":name,"in":where,"required":required,"description":desc,"schema":schema or {"type":"string"}}
    return d
dims=["api","endpoint","method","key","user","model","status","error_type","cached"]
filters=[p(d,f"Filter: only `{d}` equal to this value; repeat the parameter for any of several values. Absent values are stored as the empty string.",{"type":"array","items":{"type":"string"}}) for d in dims]
order=["requests","successes","errors","cost","tokens","tokens_in","tokens_out","request_bytes","response_bytes","cached"]
err={"description":"Bad request: the message says what is wrong and what is allowed","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Error"}}}}
unavail={"description":"Statement timeout or database unavailable; retry","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Error"}}}}
ts={"type":"string","format":"date-time"}
actor=p("X-Tally-Actor","Who makes the change, recorded in the audit trail (default anonymous).",{"type":"string"},False,"header")
name=p("name","Rule name.",{"type":"string"},True,"path")
measures=["requests","errors","error_rate","rate_limited","timeouts","server_errors","cost","tokens","tokens_in","tokens_out","latency_p95","latency_p99"]
doc={
 "openapi":"3.1.0",
 "info":{"title":"Tally","version":"0.1.0","description":"Event-sourced usage metering: ingest usage events, query exact aggregates. Times are RFC 3339; ranges are half-open [from, to). Once any API token exists, every route except /healthz, /readyz and /openapi.json needs `Authorization: Bearer <token>`: POST /v1/events the `ingest` scope, every GET the `read` scope, every other change the `admin` scope (admin includes the others). 401 without a valid token, 403 without the scope."},
 "security":[{"bearer":[]}],
 "paths":{
  "/v1/events":{"post":{"summary":"Ingest usage events","description":"JSON object, JSON array, NDJSON, MessagePack or CloudEvents (see README). Answers per-event outcomes after the commit.","requestBody":{"required":True,"content":{"application/json":{},"application/x-ndjson":{},"application/msgpack":{},"application/cloudevents+json":{},"application/cloudevents-batch+json":{}}},"responses":{"200":{"description":"Every event accepted or duplicate"},"207":{"description":"Some events rejected (see results)"},"400":err,"408":{"description":"The body did not arrive within TALLY_HTTP_BODY_TIMEOUT","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Error"}}}},"413":err,"415":err,"503":unavail}}},
  "/v1/stats":{"get":{"summary":"Aggregated time series per group, with totals","description":"Answered from the narrowest projection that covers group_by and the filters at the granularity and timezone. Buckets are atomic: every bucket overlapping [from, to) is counted in full; `covered` says which range that is.","parameters":[
     p("from","Range start (RFC 3339, inclusive). Default: `to` minus 1 h (minute), 24 h (hour), 30 d (day), 365 d (month).",ts),
     p("to","Range end (RFC 3339, exclusive). Default: now.",ts),
     p("granularity","Bucket size. Default hour.",{"type":"string","enum":["minute","hour","day","month"]}),
     p("group_by","Comma-separated dimensions (repeatable).",{"type":"string"}),
     p("tz","IANA timezone of hour/day/month buckets; must match a projection's timezone. Default UTC.",{"type":"string"}),
     p("order_by","Rank groups by this total (descending; ties by group values). With `limit`: top-N groups.",{"type":"string","enum":order}),
     p("limit","Keep the first N groups of the ranking (default ranking: requests).",{"type":"integer","minimum":1,"maximum":10000}),
     p("fill","`zero`: include empty buckets as zeros for every group.",{"type":"string","enum":["zero","none"]}),
   ]+filters,"responses":{"200":{"description":"Series and totals","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Stats"}}}},"400":err,"503":unavail}}},
  "/v1/keys":{"get":{"summary":"API keys ranked over a range","description":"Exact to the minute: the range is split into months, days, hours and minutes.","parameters":[
     p("from","Range start (RFC 3339). Default: start of this month (in tz).",ts),
     p("to","Range end (RFC 3339, exclusive). Default: now.",ts),
     p("tz","IANA timezone of the tables used. Default UTC.",{"type":"string"}),
     p("order_by","Ranking measure (descending). Default cost.",{"type":"string","enum":order}),
     p("limit","Keys returned. Default 50.",{"type":"integer","minimum":1,"maximum":1000}),
     p("offset","Keys skipped. Default 0.",{"type":"integer","minimum":0}),
   ]+[f for f in filters if f["name"]!="key"],"responses":{"200":{"description":"Keys","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Keys"}}}},"400":err,"503":unavail}}},
  "/v1/keys/{key}/stats":{"get":{"summary":"One key's page: today, this month, last 24 h, by model and api","parameters":[
     p("key","The API key.",{"type":"string"},True,"path"),
     p("at","The instant the page is computed for. Default now.",ts),
     p("tz","Timezone of today and this month. Default UTC.",{"type":"string"})],
   "responses":{"200":{"description":"The key page","content":{"application/json":{"schema":{"$ref":"#/components/schemas/KeyPage"}}}},"400":err,"503":unavail}}},
  "/v1/projections":{"get":{"summary":"What can be queried: dimensions, granularities, timezone, as_of, lag","responses":{"200":{"description":"Projections","content":{"application/json":{"schema":{"type":"object","properties":{"projections":{"type":"array","items":{"$ref":"#/components/schemas/Projection"}}}}}}},"503":unavail}}},
  "/v1/alert-rules":{
    "get":{"summary":"Every alert rule","responses":{"200":{"description":"Rules","content":{"application/json":{"schema":{"type":"object","properties":{"rules":{"type":"array","items":{"$ref":"#/components/schemas/StoredRule"}}}}}}},"503":unavail}},
    "post":{"summary":"Create an alert rule (400 name_taken when the name exists)","parameters":[actor],"requestBody":{"required":True,"content":{"application/json":{"schema":{"$ref":"#/components/schemas/Rule"}}}},"responses":{"201":{"description":"Created","content":{"application/json":{"schema":{"$ref":"#/components/schemas/StoredRule"}}}},"400":err,"503":unavail}}},
  "/v1/alert-rules/{name}":{
    "get":{"summary":"One rule","parameters":[name],"responses":{"200":{"description":"The rule","content":{"application/json":{"schema":{"$ref":"#/components/schemas/StoredRule"}}}},"404":err}},
    "put":{"summary":"Create (201) or replace (200) a rule","parameters":[name,actor],"requestBody":{"required":True,"content":{"application/json":{"schema":{"$ref":"#/components/schemas/Rule"}}}},"responses":{"200":{"description":"Replaced"},"201":{"description":"Created"},"400":err,"503":unavail}},
    "delete":{"summary":"Delete a rule; its firing alerts resolve","parameters":[name,actor],"responses":{"204":{"description":"Deleted"},"404":err}}},
  "/v1/alert-rules/{name}/audit":{"get":{"summary":"Who changed the rule, when, from what to what (newest first)","parameters":[name],"responses":{"200":{"description":"Audit entries","content":{"application/json":{"schema":{"type":"object","properties":{"entries":{"type":"array","items":{"$ref":"#/components/schemas/Audit"}}}}}}}}}},
  "/v1/alerts":{"get":{"summary":"Alerts pending or firing now, and the notification history (newest first)","parameters":[
     p("rule","Only this rule."),p("state","pending, firing or resolved.",{"type":"string","enum":["pending","firing","resolved"]}),
     p("group","dimension:value (repeatable): only alerts of groups with these values."),p("from","History created at or after.",ts),p("to","History created before.",ts),
     p("limit","Most history entries (default 100).",{"type":"integer","minimum":1,"maximum":10000})],
   "responses":{"200":{"description":"Active alerts and history","content":{"application/json":{"schema":{"type":"object","properties":{"active":{"type":"array","items":{"type":"object"}},"history":{"type":"array","items":{"$ref":"#/components/schemas/Notification"}}}}}}},"400":err}}},
  "/v1/keys/{key}/quota":{
    "get":{"summary":"The key's rolling quota: used, remaining, exceeded, resets_at (one-minute precision)","parameters":[p("key","The API key.",{"type":"string"},True,"path")],"responses":{"200":{"description":"Quota status","content":{"application/json":{"schema":{"$ref":"#/components/schemas/QuotaStatus"}}}},"404":err}},
    "put":{"summary":"Set the key's quota (201 new, 200 replaced); crossing it fires quota_exceeded","parameters":[p("key","The API key.",{"type":"string"},True,"path"),actor],"requestBody":{"required":True,"content":{"application/json":{"schema":{"type":"object","required":["measure","limit","window"],"properties":{"measure":{"type":"string","enum":["requests","errors","rate_limited","timeouts","server_errors","cost","tokens","tokens_in","tokens_out"]},"limit":{"type":"number"},"window":{"type":"string","description":"Whole minutes, e.g. 5h"}}}}}},"responses":{"200":{"description":"Replaced"},"201":{"description":"Set"},"400":err}},
    "delete":{"summary":"Remove the key's quota","parameters":[p("key","The API key.",{"type":"string"},True,"path"),actor],"responses":{"204":{"description":"Removed"},"404":err}}},
  "/metrics":{"get":{"summary":"Prometheus metrics (text format 0.0.4); see README \"Metrics\"","responses":{"200":{"description":"Prometheus exposition","content":{"text/plain":{}}},"401":err,"403":err}}},
  "/healthz":{"get":{"summary":"Liveness","security":[],"responses":{"200":{"description":"The process is up"}}}},
  "/readyz":{"get":{"security":[],"summary":"Readiness (database reachable)","responses":{"200":{"description":"ready or degraded (NATS down)"},"503":{"description":"database unreachable"}}}},
  "/openapi.json":{"get":{"security":[],"summary":"This document","responses":{"200":{"description":"OpenAPI 3.1"}}}},
 },
 "components":{"securitySchemes":{"bearer":{"type":"http","scheme":"bearer","description":"An API token from `tally tokens create`"}},"schemas":{
  "Error":{"type":"object","required":["code","error"],"properties":{"code":{"type":"string"},"error":{"type":"string"}}},
  "Group":{"type":"object","additionalProperties":{"type":"string"},"description":"Dimension values of the group, in group_by order"},
  "Covered":{"type":"object","properties":{"from":ts,"to":ts}},
  "Measures":{"type":"object","properties":{
     "requests":{"type":"integer"},"successes":{"type":"integer"},"errors":{"type":"integer"},
     "errors_by_type":{"type":"object","properties":{k:{"type":"integer"} for k in ["rate_limit","timeout","server_error","client_error","other"]}},
     "cached":{"type":"integer"},"success_rate":{"type":["number","null"]},
     "latency_ms":{"type":"object","description":"avg/min/max exact; p50/p95/p99 within 1% relative error; null without latencies","properties":{k:{"type":["number","null"]} for k in ["avg","min","max","p50","p95","p99"]}},
     "request_bytes":{"type":"integer"},"response_bytes":{"type":"integer"},"tokens_in":{"type":"integer"},"tokens_out":{"type":"integer"},
     "cost":{"type":"string","description":"Exact decimal, 9 fractional digits"},"cost_nanos":{"type":"integer"}}},
  "Point":{"allOf":[{"$ref":"#/components/schemas/Measures"},{"type":"object","properties":{"bucket":ts,"group":{"$ref":"#/components/schemas/Group"}}}]},
  "Total":{"allOf":[{"$ref":"#/components/schemas/Measures"},{"type":"object","properties":{"group":{"$ref":"#/components/schemas/Group"}}}]},
  "Stats":{"type":"object","properties":{"from":ts,"to":ts,"covered":{"$ref":"#/components/schemas/Covered"},"granularity":{"type":"string"},"timezone":{"type":"string"},"group_by":{"type":"array","items":{"type":"string"}},"projection":{"type":"string"},"as_of":{"type":["string","null"],"format":"date-time"},"order_by":{"type":["string","null"]},"limit":{"type":["integer","null"]},"series":{"type":"array","items":{"$ref":"#/components/schemas/Point"}},"totals":{"type":"array","items":{"$ref":"#/components/schemas/Total"}}}},
  "Keys":{"type":"object","properties":{"from":ts,"to":ts,"covered":{"$ref":"#/components/schemas/Covered"},"order_by":{"type":"string"},"limit":{"type":"integer"},"offset":{"type":"integer"},"total_keys":{"type":"integer"},"as_of":{"type":["string","null"],"format":"date-time"},"keys":{"type":"array","items":{"allOf":[{"$ref":"#/components/schemas/Measures"},{"type":"object","properties":{"key":{"type":"string"}}}]}}}},
  "Window":{"allOf":[{"$ref":"#/components/schemas/Measures"},{"type":"object","properties":{"from":ts,"to":ts,"covered":{"$ref":"#/components/schemas/Covered"}}}]},
  "KeyPage":{"type":"object","properties":{"key":{"type":"string"},"at":ts,"timezone":{"type":"string"},"as_of":{"type":["string","null"],"format":"date-time"},"today":{"$ref":"#/components/schemas/Window"},"this_month":{"$ref":"#/components/schemas/Window"},"last_24h":{"$ref":"#/components/schemas/Window"},"by_model":{"type":"array","items":{"$ref":"#/components/schemas/Measures"}},"by_api":{"type":"array","items":{"$ref":"#/components/schemas/Measures"}},"quota":{"type":["object","null"]}}},
  "Rule":{"type":"object","required":["name","measure","window"],"description":"Either threshold (with op) or limit with warn_at. Durations like 30s, 5m, 1h.","properties":{
     "name":{"type":"string","pattern":"^[a-z0-9_-]{1,64}$"},"severity":{"type":"string","enum":["info","warning","critical"]},"labels":{"type":"object","additionalProperties":{"type":"string"}},
     "measure":{"type":"string","enum":measures},"window":{"type":"string","description":"Rolling (1m to 31d, whole buckets) or calendar_day / calendar_month"},"timezone":{"type":"string"},
     "scope":{"type":"object","additionalProperties":{"oneOf":[{"type":"string"},{"type":"array","items":{"type":"string"}}]}},"group_by":{"type":"array","items":{"type":"string","enum":dims}},
     "op":{"type":"string","enum":[">",">=","<","<="]},"threshold":{"type":"number"},"baseline":{"type":"string","enum":["previous_window"]},
     "limit":{"type":"number"},"warn_at":{"type":"array","items":{"type":"number"}},"min_requests":{"type":"integer"},
     "for":{"type":"string"},"keep_firing_for":{"type":"string"},"repeat_every":{"type":"string"}}},
  "StoredRule":{"allOf":[{"$ref":"#/components/schemas/Rule"},{"type":"object","properties":{"version":{"type":"integer"},"created_at":ts,"updated_at":ts,"updated_by":{"type":"string"},"status":{"type":"string","enum":["ok","failing"],"description":"`failing` when the rule cannot be evaluated now (the others still are)"},"error":{"type":"string","description":"Why it is failing (only when failing)"},"failing_since":ts}}]},
  "Audit":{"type":"object","properties":{"id":{"type":"integer"},"at":ts,"actor":{"type":"string"},"action":{"type":"string","enum":["rule.create","rule.update","rule.delete","quota.set","quota.delete"]},"target":{"type":"string"},"before":{"type":["object","null"]},"after":{"type":["object","null"]}}},
  "Notification":{"type":"object","description":"The JSON body published to usage.alerts.<severity>.<rule> with Nats-Msg-Id <alert_id>:<sequence>","properties":{
     "alert_id":{"type":"string"},"rule":{"type":"string"},"state":{"type":"string","enum":["firing","resolved"]},"severity":{"type":"string"},"group":{"type":"object"},"labels":{"type":"object"},
     "measure":{"type":"string"},"value":{"type":["number","null"]},"threshold":{"type":"number"},"window":{"type":"string"},"started_at":ts,"resolved_at":{"type":["string","null"],"format":"date-time"},
     "sequence":{"type":"integer"},"level":{"type":["number","null"]},"limit":{"type":["number","null"]},"evaluated_at":ts}},
  "QuotaStatus":{"type":"object","properties":{"key":{"type":"string"},"measure":{"type":"string"},"limit":{"type":"number"},"window":{"type":"string"},"used":{"type":"number"},"remaining":{"type":"number"},"exceeded":{"type":"boolean"},"resets_at":{"type":["string","null"],"format":"date-time"},"window_start":ts,"as_of":{"type":["string","null"],"format":"date-time"},"precision":{"type":"string"}}},
  "Projection":{"type":"object","properties":{"name":{"type":"string"},"status":{"type":"string"},"dimensions":{"type":"array","items":{"type":"string"}},"granularities":{"type":"array","items":{"type":"string"}},"timezone":{"type":"string"},"tables":{"type":"array","items":{"type":"string"}},"as_of":{"type":["string","null"]},"lag_events":{"type":["integer","null"]},"events_folded":{"type":["integer","null"]},"checkpoint":{"type":["string","null"]},"rebuilding":{"type":"boolean"},"retention":{"type":["object","null"]}}}
 }}
}
open(os.path.join(os.path.dirname(os.path.abspath(__file__)),"..","src","http","openapi.json"),"w").write(json.dumps(doc,indent=1)+"\n")
