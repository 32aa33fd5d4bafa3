// Runs exported STT-UNETs in a process without Python: a TorchScript module (torch.jit.trace)
// and an AOTInductor package (torch._inductor.aoti_compile_and_package), on an input that
// Python saved, writing each output for Python to compare with eager (tests/test_libtorch.py).
// The stt ops they call come from libstt_kernels (linked, so its registrations run at start-up).
//
//   stt_libtorch_check TRACED.pt MODEL.pt2 INPUT.pt OUT_DIR
//
// writes OUT_DIR/torchscript.pt and OUT_DIR/aoti.pt (torch.save format: torch.load reads them).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

// Written beside the target and renamed over it, so a reader never sees half a file.
void write_tensor(const at::Tensor& tensor, const std::filesystem::path& path) {
  const std::vector<char> bytes = torch::pickle_save(tensor);
  const std::filesystem::path partial = path.string() + ".partial";
  {
    std::ofstream file(partial, std::ios::binary);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!file) throw std::runtime_error("cannot write " + partial.string());
  }
  std::filesystem::rename(partial, path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " TRACED.pt MODEL.pt2 INPUT.pt OUT_DIR\n";
    return 2;
  }
  try {
    const at::Tensor input = torch::pickle_load(read_bytes(argv[3])).toTensor();
    const std::filesystem::path out_dir = argv[4];
    torch::NoGradGuard no_grad;

    torch::jit::Module traced = torch::jit::load(argv[1]);
    traced.eval();
    write_tensor(traced.forward({input}).toTensor(), out_dir / "torchscript.pt");

    torch::inductor::AOTIModelPackageLoader package(argv[2]);
    const std::vector<at::Tensor> outputs = package.run({input});
    if (outputs.size() != 1) throw std::runtime_error("the AOTInductor package returned " +
                                                      std::to_string(outputs.size()) + " outputs, expected 1");
    write_tensor(outputs[0], out_dir / "aoti.pt");
  } catch (const std::exception& error) {
    std::cerr << "stt_libtorch_check: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
