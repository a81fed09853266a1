variable "REGISTRY" { default = "localhost:5000" }
variable "VERSION" { default = "1.0.0" }
variable "BASE" { default = "busybox:1.36" }

group "default" {
  targets = ["api", "worker"]
}

target "_common" {
  platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
  args = { BASE = BASE, VERSION = VERSION }
}

target "api" {
  inherits = ["_common"]
  dockerfile = "api.Dockerfile"
  tags = ["${REGISTRY}/api:${VERSION}"]
}

target "worker" {
  inherits = ["_common"]
  name = "worker-${queue}"
  matrix = { queue = ["email", "reports"] }
  dockerfile = "worker.Dockerfile"
  args = { QUEUE = queue }
  platforms = ["linux/amd64", "linux/arm64"]
  tags = ["${REGISTRY}/worker:${VERSION}-${queue}"]
}
