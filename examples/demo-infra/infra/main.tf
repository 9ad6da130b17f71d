# The demo's infrastructure: no cloud, no provider download. terraform_data stands in for the
# launch template / scaling configuration that would carry the image id in a real fleet.
variable "image_id" {
  type        = string
  description = "The image kiln baked for this commit (passed by hooks/reconcile)."
}

resource "terraform_data" "launch_template" {
  input = {
    image_id = var.image_id
  }
}

output "image_id" {
  value = terraform_data.launch_template.output.image_id
}

output "launch_template_id" {
  value = terraform_data.launch_template.id
}
