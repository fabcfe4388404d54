// Validates the Prometheus operator resources (ServiceMonitor, PodMonitor, PrometheusRule) in
// multi-document YAML files against the operator's CRD schemas (@kubernetes-models/prometheus-operator).
// Other kinds are skipped (kubernetes-validate checks the built-in ones).
//   node validate-crds.mjs FILE... ; exit 1 if any resource is invalid or a file has no resource.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const kinds = { ServiceMonitor, PodMonitor, PrometheusRule };
let failed = false;
for (const file of process.argv.slice(2)) {
  const docs = yaml.loadAll(readFileSync(file, "utf8")).filter(Boolean);
  let checked = 0;
  for (const doc of docs) {
    const Model = doc.apiVersion === "monitoring.coreos.com/v1" ? kinds[doc.kind] : undefined;
    if (!Model) continue;
    try {
      new Model(doc).validate();
      console.log(`ok ${file} ${doc.kind}/${doc.metadata?.name}`);
      checked++;
    } catch (e) {
      console.log(`INVALID ${file} ${doc.kind}/${doc.metadata?.name}: ${e.message}`);
      failed = true;
    }
  }
  if (checked === 0) {
    console.log(`NONE ${file}: no Prometheus operator resource`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
